"""The words ``extract`` looks for, in English, Italian, Vietnamese and Turkish,
and the matcher that finds them.

Lists are whole-word phrases separated by commas; a word ending in "*" may
go on ("kod*" is kodu, kodunuz, kodunuzdur...). Words are compared folded
(case-insensitive, Turkish dotted and dotless i alike), a phrase's words may
be joined by up to MAX_WORD_GAP characters ("one-time", "l'iscrizione"), and
at each word the longest phrase wins, so "promo code", "mã đơn hàng" (order
code) or "posta kodu" (postal code) are decoys although they hold a code
word. Looking a word up is one dictionary access: a line is matched in time
linear in its length, whatever it holds.
"""
from __future__ import annotations

import re

WORD = re.compile(r"\w+")

# Words that introduce a one-time code.
CODE_WORDS = """
    code, codes, passcode, passcodes, otp, pin, one time password, one time passcode, one time pin,
    temporary password, temporary passcode, temporary pin, verification, verify, 2fa, mfa, token,
    security key,
    codice, codici, password monouso, password temporanea, password usa e getta, verifica,
    mã, xác minh, xác thực, mật khẩu một lần, mật khẩu dùng một lần, mật khẩu tạm thời,
    kod*, şifre*, doğrulama, parola*
"""
# Words of offers: a code in the same sentence as one of them (or as a "%")
# is a promotion code, in the whole message.
PROMO_WORDS = """
    promo, promo code, promo codes, promotional code, discount, discount code, coupon, coupon code,
    voucher, voucher code, gift code, referral code, sale, checkout,
    sconto, sconti, saldi, codice sconto, codice promozionale, codici promozionali, codice coupon,
    codice regalo,
    mã giảm giá, mã khuyến mãi, mã voucher, giảm giá, khuyến mãi, ưu đãi,
    indirim, indirim kod*, kupon, kupon kod*, promosyon kod*, hediye kod*, kampanya
"""
# Words that say a number is something else: right before a number they
# rule it out ("Order #12345678", "Hotline: 1900 1234").
DECOY_WORDS = """
    gift card, postal code, zip code, area code, country code, tracking code, order code, error code,
    source code, qr code, bar code, barcode, tax code, sort code, swift code, bank code, branch code,
    product code, item code, booking code, reservation code, airline code, confirmation number,
    confirmation no, order, orders, invoice, receipt, transaction, txn, ref, reference, booking,
    reservation, account, acct, customer, member, membership, ticket, case, tracking, shipment, parcel,
    package, awb, postal, postcode, zip, phone, tel, telephone, call, hotline, fax, mobile, ending,
    ending in, ending with, ends in, ends with, ext, extension, flight, seat, room, gate, total,
    subtotal, amount, price, balance, qty, quantity, item, sku, model, serial, version, build, error,
    id, iban, vat, tax, contract, policy,
    codice fiscale, codice postale, codice cliente, codice ordine, codice prenotazione,
    codice di tracciamento, codice di spedizione, codice iban, codice articolo, codice prodotto,
    codice errore, codice di errore, codice a barre, ordine, fattura, ricevuta, scontrino,
    transazione, riferimento, rif, prenotazione, conto, cliente, pratica, spedizione, tracciamento,
    cap, telefono, cellulare, chiama, chiamare, chiamaci, numero verde, totale, subtotale, importo,
    prezzo, saldo, quantità, articolo, volo, errore, p iva, partita iva, termina con, termina in,
    terminante con, numero di conferma, contratto, polizza,
    mã đơn hàng, mã đơn, mã giao dịch, mã vận đơn, mã bưu chính, mã bưu điện, mã khách hàng,
    mã đặt chỗ, mã số*, mã sản phẩm, mã lỗi, mã hóa đơn, mã hoá đơn, mã tham chiếu, mã vùng,
    đơn hàng, hóa đơn, hoá đơn, giao dịch, tham chiếu, đặt chỗ, tài khoản, stk, khách hàng, vận đơn,
    bưu chính, bưu điện, điện thoại, tổng đài, gọi, tổng, tổng cộng, tổng tiền, số tiền, thành tiền,
    giá, số lượng, chuyến bay, thuế, lỗi, hợp đồng,
    posta kod*, takip kod*, kargo kod*, sipariş kod*, referans kod*, hata kod*, alan kod*,
    ürün kod*, vergi kod*, ülke kod*, rezervasyon kod*, müşteri kod*, sipariş*, fatura*, fiş,
    makbuz, işlem*, referans, rezervasyon, hesap*, müşteri, takip, kargo, gönderi*, telefon, ara,
    arayın*, çağrı merkezi, toplam, tutar*, fiyat, bakiye, adet, uçuş, vergi, hata, son 4 hane*,
    ile biten, sözleşme*, poliçe*
"""
# phrases that are neither, and keep a shorter decoy from matching ("giá trị": valid, not price)
NEUTRAL_WORDS = "giá trị"
CODE, DECOY, PROMO, NEUTRAL = "code", "decoy", "promo", "neutral"
MAX_WORD_GAP = 3  # characters between the words of one phrase ("one-time", "l'iscrizione")


def fold(word: str) -> str:
    """A word for comparison: case-folded, Turkish dotted and dotless i alike."""
    return word.casefold().replace("\u0307", "").replace("ı", "i")


def phrase_table(groups: dict[str, str]) -> tuple[dict, dict, tuple]:
    """(exact, prefixed, stems): phrases by their first word, and by the first
    letter of a first word ending in "*"; each list longest phrase first;
    the stems of those "*" words, to pass over most words at once."""
    exact: dict[str, list] = {}
    prefixed: dict[str, list] = {}
    for kind, text in groups.items():
        for phrase in text.split(","):
            words = tuple(fold(word) for word in phrase.split())
            if words[0].endswith("*"):
                prefixed.setdefault(words[0][:1], []).append((words, kind))
            else:
                exact.setdefault(words[0], []).append((words, kind))
    for table in (exact, prefixed):
        for entries in table.values():
            entries.sort(key=lambda entry: -len(entry[0]))
    stems = tuple(words[0][:-1] for entries in prefixed.values() for words, _kind in entries)
    return exact, prefixed, stems


PHRASES = phrase_table({CODE: CODE_WORDS, DECOY: DECOY_WORDS, PROMO: PROMO_WORDS,
                        NEUTRAL: NEUTRAL_WORDS})


def word_is(pattern: str, word: str) -> bool:
    """Does folded ``word`` match ``pattern`` (a word, or a stem and "*")?"""
    return word.startswith(pattern[:-1]) if pattern.endswith("*") else word == pattern


def phrase_at(words: list[tuple[int, int, str]], i: int, table: tuple) -> tuple[int, str] | None:
    """(number of words, kind) of the longest phrase of ``table`` starting at word ``i``."""
    exact, prefixed, stems = table
    first = words[i][2]
    entries = exact.get(first, [])
    if first.startswith(stems):
        entries = entries + [e for e in prefixed[first[:1]] if word_is(e[0][0], first)]
    best = None
    for phrase, kind in entries:
        n = len(phrase)
        if best is not None and n <= best[0] or i + n > len(words):
            continue
        if all(word_is(phrase[k], words[i + k][2])
               and words[i + k][0] - words[i + k - 1][1] <= MAX_WORD_GAP for k in range(1, n)):
            best = (n, kind)
    return best


def find_phrases(text: str, table: tuple) -> list[tuple[int, int, str]]:
    """(start, end, kind) of the phrases of ``table`` in ``text``, in order,
    none overlapping, neutral ones left out."""
    words = [(m.start(), m.end(), fold(m.group())) for m in WORD.finditer(text)]
    found, i = [], 0
    while i < len(words):
        match = phrase_at(words, i, table)
        if match is None:
            i += 1
            continue
        n, kind = match
        if kind != NEUTRAL:
            found.append((words[i][0], words[i + n - 1][1], kind))
        i += n
    return found


# What a link's text (or the sentence around a "click here") says it does,
# written like CODE_WORDS; "neutral" phrases stop a shorter one matching
# ("conferma d'ordine" is an order confirmation, no verification).
KIND_WORDS = phrase_table({
    "unsubscribe": """
        unsubscri*, opt out, optout, email preferences, e mail preferences, subscription preferences,
        notification preferences, newsletter preferences, manage preferences, manage your preferences,
        manage email preferences, manage your email preferences, manage subscription preferences,
        update preferences, update your preferences, update your email preferences,
        change your preferences, edit your preferences, stop receiving, stop getting, stop these emails,
        stop this email,
        disiscriv*, annulla l iscrizione, annulla iscrizione, annulla la iscrizione,
        annullare l iscrizione, cancella l iscrizione, cancella iscrizione, cancellati,
        non ricevere più, gestisci le preferenze, gestisci preferenze,
        hủy đăng ký, huỷ đăng ký, hủy nhận, huỷ nhận, ngừng nhận, từ chối nhận,
        abonelikten çık*, abonelikten ayrıl*, aboneliği iptal*, aboneliğinizi iptal*,
        aboneliği sonlandır*, listeden çık*, almak istemiyorum, e posta tercih*, bildirim tercih*""",
    "reset": """
        reset*, forgot*, recover*, change password, change your password, new password,
        create password, create a password, create a new password, set password, set your password,
        set a password, choose a new password, password reset, password change,
        reimposta*, recupera*, nuova password, cambia password, cambia la password,
        password dimenticata,
        đặt lại, khôi phục, lấy lại mật khẩu, đổi mật khẩu, quên mật khẩu, mật khẩu mới,
        sıfırla*, şifremi unuttum, yeni şifre, yeni parola, şifre* değiştir*, parola* değiştir*,
        şifre* yenile*, parola* yenile*""",
    "verify": """
        verif*, confirm, activat*, validat*,
        conferma, confermare, convalid*, attiva, attivare, attivazione,
        xác minh, xác thực, xác nhận, kích hoạt,
        doğrula*, onayla*, etkinleştir*, aktifleştir*, aktive et""",
    "login": """
        log in, login, log me in, sign in, signin, magic link,
        accedi, accesso, entra,
        đăng nhập,
        giriş*, oturum aç*""",
    NEUTRAL: """
        conferma d ordine, conferma dell ordine, conferma del ordine, conferma di ordine,
        conferma ordine, xác nhận đơn*""",
})
